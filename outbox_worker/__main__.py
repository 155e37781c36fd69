from outbox_worker.cli import main

main()
