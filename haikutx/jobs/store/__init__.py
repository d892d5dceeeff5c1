"""
Where jobs are kept: implementations of L{haikutx.interfaces.IJobStore}.
"""
