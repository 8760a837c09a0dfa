"""One module per DVC stage, each with a short ``main()``."""
