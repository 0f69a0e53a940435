from fusionfs.cli import main

main()
