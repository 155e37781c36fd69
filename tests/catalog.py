"""A database's schema as PostgreSQL's catalog describes it, to compare two databases built
different ways: relations (with their storage parameters), columns in order (their place
among the live columns: a column dropped and added again by a downgrade and upgrade lands in
the same place as on a fresh install, though its attnum is another; type, NOT NULL, default,
identity), indexes, constraints (validated or not), triggers and functions."""

from __future__ import annotations

import asyncpg

CATALOG = """
SELECT 'relation', c.relname, c.relkind::text, coalesce(array_to_string(c.reloptions, ','), '')
  FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
 WHERE n.nspname = 'public'
UNION ALL
SELECT 'column', c.relname || '.'
                 || lpad((row_number() OVER (PARTITION BY a.attrelid ORDER BY a.attnum))::text,
                         3, '0') || '.' || a.attname,
       format_type(a.atttypid, a.atttypmod),
       concat_ws(' ', CASE WHEN a.attnotnull THEN 'not null' END,
                 'default ' || pg_get_expr(d.adbin, d.adrelid),
                 'identity ' || nullif(a.attidentity::text, ''))
  FROM pg_attribute a
  JOIN pg_class c ON c.oid = a.attrelid
  JOIN pg_namespace n ON n.oid = c.relnamespace
  LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum
 WHERE n.nspname = 'public' AND c.relkind = 'r' AND a.attnum > 0 AND NOT a.attisdropped
UNION ALL
SELECT 'index', indexname, indexdef, '' FROM pg_indexes WHERE schemaname = 'public'
UNION ALL
SELECT 'constraint', c.relname || '.' || k.conname, pg_get_constraintdef(k.oid),
       CASE WHEN k.convalidated THEN 'valid' ELSE 'not valid' END
  FROM pg_constraint k
  JOIN pg_class c ON c.oid = k.conrelid
  JOIN pg_namespace n ON n.oid = c.relnamespace
 WHERE n.nspname = 'public'
UNION ALL
SELECT 'trigger', c.relname || '.' || t.tgname, pg_get_triggerdef(t.oid), t.tgenabled::text
  FROM pg_trigger t
  JOIN pg_class c ON c.oid = t.tgrelid
  JOIN pg_namespace n ON n.oid = c.relnamespace
 WHERE n.nspname = 'public' AND NOT t.tgisinternal
UNION ALL
SELECT 'function', p.proname, pg_get_functiondef(p.oid), ''
  FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
 WHERE n.nspname = 'public'
ORDER BY 1, 2
"""


async def catalog(url: str) -> list[tuple[str, str, str, str]]:
    conn = await asyncpg.connect(url)
    try:
        rows = await conn.fetch(CATALOG)
    finally:
        await conn.close()
    return [(row[0], row[1], row[2], row[3]) for row in rows]
