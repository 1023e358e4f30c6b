"""Records shared by the deployer services (DESIGN §4 typed content, §8), below Deploy and Fetch
(they use the cache's entry key, :mod:`ion.services.cache.entry`, and nothing else of a service).

:mod:`~ion.services.records.deployer` defines the repository coordinate, the item,
the fetch request and result, and the one validation of their keys; the Deploy
and Fetch services both take them from here and import nothing of each other's
for it. ``deployer.proto`` is their protobuf form (``bin/gen-protos`` regenerates
``deployer_pb2.py``); :mod:`~ion.services.records.convert` converts between the two.
"""
