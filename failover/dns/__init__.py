"""DNS rewriting for failover: RFC 2136 updates signed with TSIG, verified on every server."""
