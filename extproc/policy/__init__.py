"""Policy: the routing table (the contract between config and data plane) and the decisions
taken over it, with the state those decisions read (passive health, budgets, body memory).

Decisions here are pure functions of their inputs; nothing here answers Envoy or reads config.
"""
