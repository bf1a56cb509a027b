"""``python -m pipelines.demo --out demo_data``: makes the demo dataset and model (see :mod:`pipelines.demo.demo`)."""

from pipelines.demo.demo import main

if __name__ == "__main__":
    main()
