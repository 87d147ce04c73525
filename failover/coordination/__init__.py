"""The coordination store (etcd) behind a small interface, with an in-memory fake."""
