from ropescope.cli import main

raise SystemExit(main())
