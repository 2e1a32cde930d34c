"""metanode: a Raft-replicated metadata service (a databend-meta work-alike) on Trio."""

__version__ = "0.1.0"
