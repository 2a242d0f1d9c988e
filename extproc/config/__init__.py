"""Config: the CRD models, where objects come from, and how they become a routing table."""
