"""The embedding store (in-process, Redis), its versions, and the admin that loads bundles."""
