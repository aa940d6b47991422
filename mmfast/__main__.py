from mmfast.cli import main

raise SystemExit(main())
