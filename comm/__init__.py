"""splitserve.comm"""
