from encoder_train.cli import main

raise SystemExit(main())
