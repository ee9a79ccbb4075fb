from setuptools import find_packages, setup

setup(
    name="dache",
    version="0.4.0",
    description="A durable cache served over HTTP/JSON, on Twisted.",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.11",
    packages=find_packages(include=["dache", "dache.*"]) + ["twisted.plugins"],
    package_data={
        "twisted": ["plugins/dache_plugin.py"],
        "dache.web": ["openapi.json", "console/*"],  # console/: the web console (/ui)
    },
    install_requires=[
        "Twisted[tls]>=26.10,<27",  # tls: ssl: endpoints; <27: dache/web/twisted_private.py
        "klein>=24.8",
        "txpostgres>=1.7",
        "psycopg2-binary>=2.9",
        "prometheus_client>=0.20",
        "google-crc32c>=1.5",
        "httpx>=0.27",  # dache.client and dachectl
        "tqdm>=4.66",  # dachectl import/export progress bar
        "sortedcontainers>=2.4",  # the sorted key index (list by prefix)
    ],
    entry_points={"console_scripts": ["dachectl = dache.ctl:main"]},
    extras_require={
        "test": [
            "pytest>=8",
            "pytest-twisted>=1.14",
            "treq>=24.9",
            "ruff>=0.6",
            "cryptography>=42",  # throwaway certificates for the TLS tests
            "schemathesis>=4.32,<5",  # tests/test_schemathesis.py fuzzes the OpenAPI contract
            "selenium>=4.20",  # the web console in headless Chromium (Debian's chromedriver)
        ],
        "bench": [
            "matplotlib>=3.8",
            "py-spy>=0.3",  # bench.profile: sampling profiles of a server under load
            "pyinstrument>=4.6",
            "redis>=5",  # bench.peers: preloading Redis, reading its INFO
        ],
    },
    classifiers=[
        "Framework :: Twisted",
        "Programming Language :: Python :: 3",
    ],
)
