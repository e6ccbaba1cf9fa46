"""greenleader: leader election for gevent applications on Consul, etcd, ZooKeeper or a local file.

>>> from greenleader import Candidate
>>> from greenleader.stores import from_url
>>> candidate = Candidate(from_url("file:///tmp/elections"), "jobs/scheduler", "web-1")
>>> elected, errors = candidate.run_for_election()
"""

from __future__ import annotations

from . import errors, events
from .candidate import Candidate
from .follower import Follower
from .retry import Backoff
from .stores import from_url, new_store

__all__ = ["Backoff", "Candidate", "Follower", "__version__", "errors", "events", "from_url", "new_store"]

__version__ = "0.1.0"
