"""The ``twistd cc`` plugin: a pointer to :mod:`ion.core.tap` (loaded only when used)."""

from twisted.application.service import ServiceMaker

ionCapabilityContainer = ServiceMaker(
    "ION capability container",
    "ion.core.tap",
    "Start an ION capability container, its apps (.app/.rel files) and the interactive shell.",
    "cc",
)
