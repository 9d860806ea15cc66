"""Deployment topologies (deploy/compose, deploy/kubernetes), checked offline."""
