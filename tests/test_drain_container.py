"""The container image and the pod manifest agree with the configs they ship and mount.

No Docker engine or cluster here: these check the files themselves, that the drain
settings fit together (grace periods above drain_timeout) and that ports and paths
match the config.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from ambassador.config import loadConfig
from ambassador.endpoints import _split

ROOT = Path(__file__).resolve().parent.parent
KUBERNETES = ROOT / "conf" / "kubernetes"


def documents() -> dict[str, dict]:
    found = {}
    for path in sorted(KUBERNETES.glob("*.yaml")):
        for document in yaml.safe_load_all(path.read_text()):
            found[document["kind"]] = document
    return found


def listenPort(endpoint: str) -> int:
    args, kwargs = _split(endpoint)
    return int(kwargs.get("port", args[1]))


@pytest.fixture(scope="module")
def pod():
    return documents()["Pod"]


@pytest.fixture(scope="module")
def sidecar(pod):
    [container] = [c for c in pod["spec"]["initContainers"] if c["name"] == "ambassador"]
    return container


@pytest.fixture(scope="module")
def mounted(pod, sidecar, tmp_path_factory):
    """The config the sidecar reads, as the ConfigMap mounts it, loaded and validated."""
    configMap = documents()["ConfigMap"]
    args = sidecar["args"]
    configPath = Path(args[args.index("--config") + 1])
    [mount] = [m for m in sidecar["volumeMounts"] if configPath.is_relative_to(m["mountPath"])]
    [volume] = [v for v in pod["spec"]["volumes"] if v["name"] == mount["name"]]
    assert volume["configMap"]["name"] == configMap["metadata"]["name"]
    key = str(configPath.relative_to(mount["mountPath"]))
    path = tmp_path_factory.mktemp("configmap") / key
    path.write_text(configMap["data"][key])
    return loadConfig(str(path))


def test_the_sidecar_starts_before_the_app_and_runs_beside_it(pod, sidecar):
    assert sidecar["restartPolicy"] == "Always"  # a native sidecar
    assert sidecar["startupProbe"]["httpGet"]["path"] == "/ready"
    assert [c["name"] for c in pod["spec"]["containers"]] == ["app"]


def test_the_probes_ask_the_admin_endpoint_of_the_mounted_config(sidecar, mounted):
    assert mounted.admin is not None
    _, kwargs = _split(mounted.admin)
    assert kwargs.get("interface") == "0.0.0.0", "the kubelet cannot probe a loopback-only admin"
    ports = {p["name"]: p["containerPort"] for p in sidecar["ports"]}
    for probe, path in (("startupProbe", "/ready"), ("readinessProbe", "/ready"),
                        ("livenessProbe", "/live")):
        httpGet = sidecar[probe]["httpGet"]
        assert httpGet["path"] == path
        assert ports[httpGet["port"]] == listenPort(mounted.admin)


def test_the_grace_period_is_longer_than_the_largest_drain_timeout(pod, mounted):
    largest = max(route.drainTimeout for route in mounted.routes)
    assert pod["spec"]["terminationGracePeriodSeconds"] > largest


def test_the_app_is_pointed_at_the_routes_that_listen_on_loopback(pod, mounted):
    [app] = pod["spec"]["containers"]
    listens = {listenPort(r.listen) for r in mounted.routes}
    for route in mounted.routes:
        assert "interface=127.0.0.1" in route.listen
    used = set()
    for variable in app["env"]:
        match = re.search(r"127\.0\.0\.1:(\d+)", variable["value"])
        if match:
            used.add(int(match[1]))
    assert used == listens


# --- the Dockerfile --------------------------------------------------------------------


def dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n", " ", "\n".join(
        line for line in (ROOT / "Dockerfile").read_text().splitlines()
        if not line.lstrip().startswith("#")
    ))
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1])
            for line in text.splitlines() if line.strip()]


def test_the_image_runs_twistd_in_the_foreground_without_a_pid_file_as_non_root():
    instructions = dockerfile()
    [entrypoint] = [a for i, a in instructions if i == "ENTRYPOINT"]
    assert json.loads(entrypoint) == ["twistd", "-n", "--pidfile=", "ambassador"]
    users = [a for i, a in instructions if i == "USER"]
    assert users and users[-1].split(":")[0] not in ("0", "root")
    [cmd] = [a for i, a in instructions if i == "CMD"]
    assert json.loads(cmd) == ["--config", "/etc/ambassador/ambassador.toml"]


def test_the_image_config_exposes_and_health_checks_its_admin_port():
    instructions = dockerfile()
    copies = [shlex.split(a) for i, a in instructions if i == "COPY"]
    [source] = [c[0] for c in copies if c[-1] == "/etc/ambassador/ambassador.toml"]
    config = loadConfig(str(ROOT / source))
    port = listenPort(config.admin)
    assert [a for i, a in instructions if i == "EXPOSE"] == [str(port)]
    [health] = [a for i, a in instructions if i == "HEALTHCHECK"]
    assert f"http://127.0.0.1:{port}/live" in health
    assert "curl" not in health  # slim images have none
    assert any("getPlugins(IPlugin)" in a for i, a in instructions if i == "RUN")


def test_the_build_context_lets_in_what_the_dockerfile_copies():
    allowed = [line[1:].rstrip("/") for line in (ROOT / ".dockerignore").read_text().splitlines()
               if line.startswith("!")]
    for instruction, arguments in dockerfile():
        if instruction == "COPY" and "--from" not in arguments:
            for source in shlex.split(arguments)[:-1]:
                assert source.rstrip("/").removeprefix("./") in allowed, source


# --- the Dockerfile's build steps, run for real in a fresh venv ------------------------


def buildContext(target: Path) -> Path:
    """A copy of what .dockerignore lets into the build context."""
    for line in (ROOT / ".dockerignore").read_text().splitlines():
        if not line.startswith("!"):
            continue
        source = ROOT / line[1:].rstrip("/")
        destination = target / line[1:].rstrip("/")
        destination.parent.mkdir(parents=True, exist_ok=True)
        if source.is_dir():
            shutil.copytree(source, destination, ignore=shutil.ignore_patterns(
                "__pycache__", "*.pyc", "dropin.cache"))
        else:
            shutil.copy2(source, destination)
    return target


@pytest.mark.slow
def test_the_dockerfile_build_steps_pass_in_a_fresh_venv(tmp_path):
    """The build stage's RUN (venv, pip install ., plugin cache, twistd --help), with
    /opt/ambassador moved to a temporary directory; then the final stage's check of
    the baked config.  No Docker engine is needed (nor available in CI)."""
    instructions = dockerfile()
    stages = [i for i, (instruction, _) in enumerate(instructions) if instruction == "FROM"]
    build = instructions[stages[0]:stages[1]]
    [install] = [a for i, a in build if i == "RUN"]
    prefix = tmp_path / "opt-ambassador"
    version = f"python{sys.version_info.major}.{sys.version_info.minor}"
    script = (install.replace("/opt/ambassador", str(prefix))
              .replace("python3.11", version)
              .replace("python -m venv", f"{shlex.quote(sys.executable)} -m venv", 1))
    context = buildContext(tmp_path / "context")
    environment = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    result = subprocess.run(["sh", "-ec", script], cwd=context, env=environment,
                            capture_output=True, text=True, timeout=600, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    assert not (prefix / "bin" / "pip").exists()
    final = instructions[stages[1]:]
    [check] = [a for i, a in final if i == "RUN" and "ambassador check" in a]
    assert "--config /etc/ambassador/ambassador.toml" in check
    result = subprocess.run(
        [prefix / "bin" / "python", "-m", "ambassador", "check", "--config",
         context / "conf" / "container.toml"],
        cwd=tmp_path, env=environment, capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
