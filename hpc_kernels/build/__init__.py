"""Image builds: the orchestrator (:mod:`.orchestrator`) and what it uses.

- :mod:`.stamps`: input digests, build records, image state, the ``%files`` inputs of a recipe;
- :mod:`.orchestrator`: the one build path (lock, log, temporary places, image check, record) of every runtime;
- :mod:`.temp`, :mod:`.guard`: a build's own places and the guard that ties its processes to the build;
- :mod:`.imagecheck`: can an image start its kernel; :mod:`.provenance`: what a built image says it holds;
- :mod:`.recipe`, :mod:`.recipegen`, :mod:`.derive`: recipe headers, generated recipes and their stages, the
  derived recipe a build runs.

Nothing is imported here: :mod:`.guard` runs as a script and :mod:`.imagecheck` is used at install time.
"""
