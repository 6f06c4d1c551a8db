"""The report stage: runs/ -> reports/ (tables, figures, index.md, provenance.json).

    python -m pipelines.report [--runs runs] [--out reports] [--profile P | profile=P]

What gets rendered is the list pipelines.report.specs.SPECS; each spec turns its runs into numbers with
provenance (pipelines/report/model.py describes the seam), taking its runs through the one selection
function, pipelines/report/selection.py. The paper's numbers live in paper.yaml. The report imports no
training module (Fig. 4's surface comes from pipelines/surface.py). What we found (index.md's first section, and
README.md's block from a published report: `python -m pipelines.report.findings`) is pipelines/report/findings.py.
"""
