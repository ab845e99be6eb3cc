"""`python -m edm.train`: the edm-train command (edm.cli.train)."""
from edm.cli.train import main

if __name__ == "__main__":
    main()
