"""The expert's side of a project: export of a batch, ingest and validation of masks, the review page.

``export`` writes ``rounds/RRR/`` for a person; ``ingest`` validates and stores masks from files or
uploads; ``server`` is the FastAPI app behind the review page (``static/``). Nothing here trains
or selects.
"""
