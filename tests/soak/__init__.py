"""Soak: enqueue at a steady rate through three paths while injecting faults, then prove
that nothing was lost and that every repeat had a cause.

    python -m tests.soak [--minutes 3] [--rate 60] [--workers 4] ...   (make soak SOAK_ARGS=...)

It starts its own embedded PostgreSQL in a temporary folder (or uses DATABASE_URL, which
must name a database dedicated to the soak; restarts are then skipped), migrates it, runs
the API (``uvicorn app.main:app``) and several ``outbox-worker run tests.soak.tasks:registry``
processes, and enqueues through ``POST /reports`` and ``POST /signup``, through
``enqueue``/``enqueue_many`` and through plain SQL ``INSERT``s. A share of the Python and SQL
jobs (``--hostile-share``) is hostile: results and errors the database cannot store, raises
of what is not an Exception, args as deep as enqueue allows, and (by SQL) deeper than any
reader decodes. Meanwhile it kills workers with SIGKILL (and starts replacements), stops them
with SIGSTOP past their lease, restarts them with SIGTERM (a replacement first; the old one
must drain and exit 0), locks running jobs' rows from a session of its own past the lease
(and for less), restarts PostgreSQL (fast and immediate) and terminates worker and listener
connections.

At the end it stops enqueueing, waits for the queue to empty, drains the workers (SIGTERM)
and checks the invariants against three records: the jobs table, the execution log the
handlers write (``soak_executions``) and a trigger's log of every state change
(``soak_transitions``); the workers' logs say how often each defence was needed (a result
made storable, a lease not extended, a handler stopped by the lease guard). Every enqueue
carries a unique marker (a dedupe key, an Idempotency-Key, an e-mail address), so an enqueue
whose outcome a lost connection hid is retried safely and reconciled against the table:
"committed" is what is in the table. What the fault suite's checker
(``tests/faults/invariants.py``) checks of a row and its executions is checked by it here
too; the rest (the ledger, the transition log, the hostile kinds, the run's own facts) is
the soak's.

The subprocesses run a snapshot of the code taken at start, so that edits made to the
working tree during a long soak cannot reach the replacement workers halfway through.
Exit status 0 only when every invariant holds.

Modules: ``options`` (the command line), ``cluster`` (PostgreSQL, the API, the workers),
``producers`` (the three enqueue paths), ``faults`` (the injector), ``tasks`` (what the
workers run), ``records`` (the ledger, the faults and the tables read back), ``repeats`` and
``check`` (the invariants), ``hostile`` (what each hostile kind must leave behind),
``report`` (the table) and ``__main__`` (the run).
"""
