"""Snapshots of engines' brains: a store of content-addressed blobs and manifests
(app.snapshots.store), the copy of a brain directory into it and back (app.snapshots.tree), the
service the operations use (app.snapshots.service), the operations' bodies
(app.snapshots.bodies) and the scheduled snapshots (app.snapshots.schedule)."""
