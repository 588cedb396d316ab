"""The active-learning core: the MC-dropout engine, selection strategies, annotators and the loop.

``uncertainty`` scores the pool, ``strategies`` choose from the scores, ``annotators`` answer
(the simulated one at once, a person through files or the review page), and ``loop`` drives a
run or project directory through its durable steps.
"""
