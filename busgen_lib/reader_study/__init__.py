"""The reader-study platform (paper §2.2 visual Turing test, §2.5 reader study): a small web application.

An organiser creates a study folder from manifests of real and generated images
(`create.create_study`), serves it (`app.create_app`, or `python -m busgen_lib
reader-study serve`), sends each reader their private link and exports the
answers as a CSV that `busgen_lib.evaluate.turing` reads unchanged.
"""
