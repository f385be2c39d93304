"""``python -m nvfp4kit.synthetic``: the synthetic checkpoint generator, a fixture, lives in nvfp4kit/fixtures/synthetic.py."""

from .fixtures.synthetic import *  # noqa: F401,F403  (the names callers of this module import)
from .fixtures.synthetic import main

if __name__ == "__main__":
    main()
