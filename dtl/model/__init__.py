"""What a logged model needs at serving time, and nothing else.

``dtl.model`` is the package that travels inside every logged model (``code/dtl/model``): the
network (:mod:`~dtl.model.net`), the preprocessing (:mod:`~dtl.model.preprocess`,
:mod:`~dtl.model.mask`), the bounded decoding of user input (:mod:`~dtl.model.decode`) and the
pyfunc classes (:mod:`~dtl.model.pyfunc` for softmax, :mod:`~dtl.model.fuzzy` for the fuzzy
head). It imports only itself, the standard library and the distributions the model pins
(``tests/test_structure.py`` enforces it). Training code imports from here; nothing here
imports training code.
"""
