from dtl.cli import main

raise SystemExit(main())
