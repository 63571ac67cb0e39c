"""Moved to :mod:`kvbridge.transport.loading` (the observer relay to :mod:`kvbridge.observe`);
this old path is kept for one release."""

from kvbridge.observe import OBSERVER_GROUP as OBSERVER_GROUP
from kvbridge.observe import ObserverRelay as ObserverRelay
from kvbridge.transport.loading import *  # noqa: F403
