"""relax_passes"""
