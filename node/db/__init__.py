"""The node's database: typed models (:mod:`node.db.models`), engine, migrations and the
repository, one module per concept (all queries; see ``docs/architecture.md``)."""
