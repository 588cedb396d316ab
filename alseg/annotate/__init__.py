"""The expert's side of a project: batches out, masks in, their history and cost, the review page.

``export`` writes ``rounds/RRR/`` for a person; ``ingest`` validates and stores masks from files or
uploads, for the open batch or any exported round; ``effort`` summarises what the expert did;
``exchange`` (with ``coco``, ``cvat``, ``labelstudio``, one module per format) takes every expert
mask out to other tools and reads their files back; ``auth`` names annotators by their tokens;
``turnover`` makes the next round from the page in a worker, through the loop's own steps;
``server`` is the FastAPI app behind the review page (``static/``). Nothing here trains or selects
itself.
"""
