"""The local platform's application database: the operational table a fraud model wants to know
about, kept by "the application" (the generator writes it in step with the transactions it
produces) and captured by Debezium.

``public.accounts``: one row per account, keyed by the id the transactions carry; its status,
credit limit and home country change over time, and accounts are closed (deleted).
"""

from __future__ import annotations

#: The application's own role: owns the database and its tables, writes them.
APP_ROLE = "app"


def ddl(signal_table: str) -> tuple[str, ...]:
    """Idempotent DDL of the application's tables and of Debezium's signalling table
    (``cdc.signal_table``: a row in it asks the connector for an ad-hoc snapshot), run by the
    table owner at every ``up``."""
    schema, table = signal_table.split(".", 1)
    return (
        """
        create table if not exists public.accounts (
            account_id   text primary key,
            status       text not null,
            credit_limit numeric(12, 2) not null,
            home_country text not null,
            updated_at   timestamptz not null default now()
        )
        """,
        f"""
        create table if not exists "{schema}"."{table}" (
            id   varchar(64) primary key,
            type varchar(32) not null,
            data varchar(2048)
        )
        """,
    )
