"""The Trio runtime of one node: raft loop, apply loop, join/leave, servers."""
