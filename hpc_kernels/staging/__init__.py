"""Staging: fetch on a node with network (the login node) what a build would fetch, so the build itself
(in a Slurm job on a compute node without internet) needs none.

What a build fetches is read from its recipe and the registry, never guessed from a failure:

- the base of every ``Bootstrap: docker|oras|library`` stage: its tag is resolved to a digest once
  (``build --pull`` asks again), the image pulled once into a SIF named by that digest, and reused;
- the Python packages: the kernel's ``requirements:``, the requirement files and packages the recipe's own
  ``%post`` installs with pip, and ipykernel for a generated recipe whose base lacks it. ``pip download``
  fetches wheels for the base image's Python and platform (asked of the staged image itself) into a
  wheelhouse named by what it holds, reused while those inputs do not change; plus a pip wheel, so an image
  without pip can install them.

A staged build (:data:`Fetch.STAGED`) takes all of that from the cache and nothing from the network: what is
missing is named, with how to stage it. The cache is ``$XDG_CACHE_HOME/hpc-kernels/staging``; every entry
appears whole (written beside, renamed in) or not at all.

Modules: :mod:`.needs` (what a build needs), :mod:`.inputs` (fetched into the cache), :mod:`.wheelhouse` (pip),
:mod:`.cache` (what is staged), :mod:`.prepare` (the derived recipe), :mod:`.requirements` (requirement files
and locks). Nothing is imported here.
"""
