"""`python -m meshrt.simulator`: the simulator's command line (the flags are in `meshrt.simulator`)."""

from meshrt.simulator import main

if __name__ == "__main__":
    raise SystemExit(main())
