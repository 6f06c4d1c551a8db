"""The tables and figures the report renders, in the order index.md shows them.

Adding a table or figure = one module here defining SPEC (see pipelines/report/model.py for the interface;
pipelines/report/comparison.py for the baseline-vs-GAL-over-seeds kind) + one line below + its paper numbers
in pipelines/report/paper.yaml. Every spec listed is required: its runs missing -> the report fails.
"""
from pipelines.report.specs import fig4, table5

SPECS = [
    table5.SPEC,
    fig4.SPEC,
]
