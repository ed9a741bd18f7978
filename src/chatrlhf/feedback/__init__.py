"""Human feedback: the store (SQLAlchemy, Alembic migrations) and the export to training records."""
