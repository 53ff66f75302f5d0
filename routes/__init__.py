"""HTTP routes, one router per protocol: each parses the wire format, calls the served model's runtime
and formats the answer. Wire schemas and translation live in `protocols/`; routes add only HTTP."""
