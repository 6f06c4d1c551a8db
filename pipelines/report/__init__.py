"""The report stage: runs/ -> reports/ (tables, figures, index.md, provenance.json).

    python -m pipelines.report [--runs runs] [--out reports] [--profile P | profile=P]

What gets rendered is the list pipelines.report.specs.SPECS; each spec turns its runs into numbers with
provenance (pipelines/report/model.py describes the seam). The paper's numbers live in paper.yaml.
"""
