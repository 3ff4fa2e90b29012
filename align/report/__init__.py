"""``python -m align.report``: a sweep's tables and figures from its run directories (cli, data, tables, plots).

May import: ``align.core``. Docstring only: importing it does nothing.
"""
