from fastopt._cli import main

raise SystemExit(main())
