"""``python -m kdplug`` (also what ``torchrun -m kdplug`` starts)."""

from kdplug.cli import main

if __name__ == "__main__":
    main()
