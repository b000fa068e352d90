"""The business of creditpool: models, services that move credits, and pure rules.

Nothing in here knows about GraphQL or HTTP. Services take a `Database` and own their
transaction boundary (see `domain.db.Database.transaction`), which is the one place that commits.
"""
