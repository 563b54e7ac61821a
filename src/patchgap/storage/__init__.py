"""Object storage: the S3 store (manifests written last, verified downloads), the embedded
SeaweedFS server and the credentials both share.

May import: the ground floor only.
"""
