"""smoothgrad-audit: SmoothGrad saliency corpora from TFRecord datasets on Apache Beam."""

from pathlib import Path

from setuptools import find_packages, setup

setup(
    name="smoothgrad-audit",
    version="0.1.0",
    description="Batch SmoothGrad saliency corpora from TFRecord image datasets, on Apache Beam.",
    long_description=(Path(__file__).parent / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    python_requires=">=3.10,<3.13",
    packages=find_packages(include=["pipelines", "pipelines.*", "transforms", "transforms.*"]),
    package_data={"pipelines.report": ["templates/*.j2"]},  # the report's HTML templates
    install_requires=[
        "apache-beam>=2.77.0,<2.78",
        "tensorflow>=2.21.0,<2.22",
        "keras>=3.12,<4",
        "numpy>=1.26,<3",
        "pyarrow>=25.0,<26",
        "protobuf>=6.31,<7",
        "PyYAML>=6.0,<7",
        "google-crc32c>=1.5,<2",
        # the audit report: HTML from templates, figures
        "Jinja2>=3.1,<4",
        "matplotlib>=3.9,<4",
        # the audit: the graph Laplacian and its smallest eigenpairs, k-means, two-sample tests
        "scipy>=1.13,<2",
    ],
    extras_require={
        "test": [
            "pytest>=8,<10",
            "pandas>=2.2,<4",
            "polars>=1.0,<3",
            "duckdb>=1.1,<3",
            "pillow>=10,<13",
            # a local Google Cloud Storage for the gs:// tests (with the gcp extra)
            "gcp-storage-emulator>=2026.7,<2027",
            # drives Debian's chromium (not a downloaded browser) in the report's browser test
            "playwright>=1.50,<2",
            # the packaging test builds the sdist and a wheel offline (no build isolation);
            # the container test compares the Dockerfile's pins with the requirements above
            "setuptools>=61",
            "packaging>=23",
            # _FINDINGS.json is checked against its JSON Schema
            "jsonschema>=4.18,<5",
            # the audit's JUnit XML is read back as CI systems read it
            "junitparser>=3.1,<6",
            # integrated gradients and Grad-CAM are checked against PAIR saliency and tf-keras-vis
            "saliency>=0.2.1,<0.3",
            "tf-keras-vis>=0.8.7,<0.9",
        ],
        "gcp": ["apache-beam[gcp]>=2.77.0,<2.78"],
        # benchmarks/peers.py (peer SmoothGrad libraries) and the pipeline benchmark
        # (peak RSS of a process tree). xplique: 1.4-1.5 require tensorflow<2.16 and
        # numpy<2, 2.x require tensorflow<=2.20, so 1.3.3 (no upper bound) is the
        # only release that installs next to TensorFlow 2.21.
        "bench": [
            "saliency>=0.2.1,<0.3",
            "tf-keras-vis>=0.8.7,<0.9",
            "xplique>=1.3.3,<1.4",
            "psutil>=7.0,<8",
        ],
    },
    entry_points={"console_scripts": ["smoothgrad-audit=pipelines.smoothgrad_audit:main"]},
)
