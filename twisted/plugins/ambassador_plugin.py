"""The `ambassador` twistd plugin.

Kept tiny on purpose: twistd imports every dropin while scanning for plugins, so this
module must import nothing heavy and never the global reactor (TWISTED-NOTES).
"""

from twisted.application.service import ServiceMaker

ambassador = ServiceMaker(
    "Ambassador",
    "ambassador.tap",
    "An outbound proxy with retries, timeouts and circuit breakers.",
    "ambassador",
)
