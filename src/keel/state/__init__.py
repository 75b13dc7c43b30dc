"""What keel replicas share, in engines made for it.

One keel keeps everything in its process and in SQLite under its data root.
Several replicas behind a load balancer share two things:

- per-key rate limits, in Redis (``[state] redis_url``): ``shared_limits``;
- completion events and acceptance, in PostgreSQL (``[events] database_url``):
  ``postgres_events``, with versioned schema migrations in ``migrate``.

Circuit breakers, provider health, admission queues and superseding stay per
replica: each replica judges the backends it reaches itself, as Envoy's
outlier detection does per host. An outage of Redis or Postgres never fails a
completion: limits fall back to per replica, events are buffered and, past a
bound, dropped and counted.
"""
