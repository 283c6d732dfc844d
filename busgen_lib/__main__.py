from busgen_lib.cli import main

raise SystemExit(main())
